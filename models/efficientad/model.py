"""EfficientAD (Batzner, Heckler & Koenig, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024), in plain torch: the networks and the model.

Parts:

* the patch description networks (PDN, in `pdn`): the frozen teacher and the student (768 = 2 x 384:
  the first half imitates the teacher, the second half the autoencoder);
* the autoencoder: six strided 4x4 convolutions down to a 1x1 bottleneck of 64 channels, and a
  decoder of bilinear upsamplings + 4x4 convolutions (+ dropout) back to the teacher's output size.
  The paper's sizes are for 256x256 inputs; here every size is derived from the tile size, so any
  tile size from 33 pixels works;
* `EfficientAD`: the three networks plus the normalisation statistics and thresholds as buffers, so
  that a state dict carries everything needed at inference; `build_efficientad_from_checkpoint`.

Elsewhere in this package: the losses and the autoencoder's input augmentation (`loss`), the teacher
sources (`teacher`: the publicly distributed teacher_small.pth / teacher_medium.pth, or the paper's
distillation from a pretrained backbone) and the training recipe (`train`).

Input convention (`knitwatch.models.base`): tiles are RGB (or single-channel gray, replicated to three
channels), uint8 in [0, 255]; the model scales them to [0, 1] and normalises them with ImageNet statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knitwatch.models.base import AnomalyModel, UntrainedWarning, restore_model
from knitwatch.models.checkpoint import Checkpoint
from knitwatch.models.efficientad.pdn import OUT_CHANNELS, ModelSize, build_pdn, normalize_size, pdn_output_size
from knitwatch.models.efficientad.teacher import TeacherWeights

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


# A checkpoint whose teacher was random (`knitwatch.models.efficientad.teacher.random_teacher`) says so.
RANDOM_TEACHER_WARNING = UntrainedWarning("teacher", "random_teacher", "random_teacher_checkpoint", msg=(
    "this EfficientAD model was trained with a RANDOM (untrained) teacher; its detections are not trustworthy"))


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
    return restore_model(model, ckpt, RANDOM_TEACHER_WARNING)
