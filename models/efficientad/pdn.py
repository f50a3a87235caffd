"""EfficientAD's patch description networks (PDN), small and medium: the frozen teacher (384 output
channels) and the student (768 = 2 x 384) are PDNs. Shared by the model (`model`) and the teacher's sources
(`teacher`)."""

from __future__ import annotations

from typing import Literal

from torch import nn

ModelSize = Literal["s", "m"]
OUT_CHANNELS = 384

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
