"""MSFlow (Zhou, Xu, Song, Shen & Shen, "MSFlow: Multi-Scale Flow-based Framework for Unsupervised
Anomaly Detection", IEEE TNNLS 2024), written for knitwatch from the paper, with FrEIA.

Parts:

* extractor (`knitwatch.models.backbones.extractor.MultiScaleExtractor`): a frozen pretrained CNN's maps at
  strides 4, 8 and 16, each average-pooled 3x3/stride 2 (16x16, 8x8, 4x4 cells for a 128x128 tile),
  standardised per channel with statistics of the training tiles (buffers);
* parallel flows: per scale a FrEIA ``SequenceINN`` of `ConditionalCoupling` blocks (affine coupling
  with a conv-LayerNorm-ReLU-conv subnet, conditioned on a 2-D sinusoidal positional encoding, soft
  clamped scales, a learned per-channel affine and a fixed channel permutation). The depth differs per
  scale (the paper's asymmetric flows, default 2, 5, 8 blocks from the finest to the coarsest scale);
* fusion flow: a FrEIA ``GraphINN`` of `FusionCoupling` blocks taking the three scales at once: each
  scale's scale/shift are computed from all scales pooled to the smallest map and brought back by
  bilinear upsampling, so the scales exchange information while the whole stays invertible;
* loss: the negative log-likelihood of the outputs under a standard normal, ``0.5 * ||z||^2`` minus
  all log-determinants, per dimension (`nll_loss`);
* post-processing (the paper's two aggregations, made comparable across images): per scale the
  per-cell negative log-likelihood ``a = 0.5 * mean_c z^2`` is upsampled to the tile and normalised
  with statistics of normal validation tiles stored in the model (``a' = (a - loc) / spread``, not
  each image's own maximum), and read as a likelihood relative to normal, ``p = exp(-a')``.
  Localisation adds the scales' likelihoods: ``map = -log(mean_s p_s)`` (a soft minimum of the a',
  the same ranking as the paper's sum of probability maps without its saturation); detection
  multiplies them: ``-log(prod_s p_s) = sum_s a_s'``, and the image score is the mean of the top
  ``topk`` fraction of that map's pixels. Maps are computed batch by batch; nothing holds all maps.

FrEIA supplies the graph machinery (``InvertibleModule``, ``SequenceINN``, ``GraphINN``); the coupling
blocks are knitwatch's own, so the state dict layout (permutations are plain buffers) and the soft
clamping do not depend on the FrEIA release (0.2 on PyPI and its later repository code differ in both
for ``AllInOneBlock``).

Input convention: as EfficientAD, uint8 RGB or gray tiles (gray replicated to three channels), scaled to
[0, 1] and normalised with ImageNet statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from FrEIA.framework import GraphINN, InputNode, Node, OutputNode, SequenceINN
from FrEIA.modules import InvertibleModule
from torch import Tensor, nn

from knitwatch.models.backbones.extractor import LITE0, MultiScaleExtractor
from knitwatch.models.base import AnomalyModel, UntrainedWarning, restore_model
from knitwatch.models.checkpoint import Checkpoint
from knitwatch.models.registry import MSFLOW_BACKBONES

KIND_PREFIX = "msflow-"
KINDS: tuple[str, ...] = tuple(KIND_PREFIX + b for b in MSFLOW_BACKBONES)
DEFAULT_FLOW_BLOCKS: tuple[int, int, int] = (2, 5, 8)
DEFAULT_CLAMP = 1.9
DEFAULT_PE_CHANNELS = 64
DEFAULT_TOPK = 0.03
MIN_TILE_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def soft_clamp(s: Tensor, alpha: float) -> Tensor:
    """``(2 alpha / pi) * atan(pi s / (2 alpha))``: slope 1 at 0 (the identity for small s), bounded to
    (-alpha, alpha), so no block can scale a value by more than ``exp(alpha)``."""
    return (2.0 * alpha / math.pi) * torch.atan(s * (math.pi / (2.0 * alpha)))


def positional_encoding_2d(
    channels: int, height: int, width: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(1, channels, height, width) sinusoidal encoding of the cell position.

    The first half of the channels encodes the column, the second half the row; each half alternates
    sin and cos of the position at geometrically spaced frequencies (1 down to 1/10000).
    """
    if channels % 4:
        raise ValueError(f"positional encoding channels must be a multiple of 4, got {channels}")
    quarter = channels // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, :] * freq[:, None]  # (q, W)
    ys = torch.arange(height, device=device, dtype=torch.float32)[None, :] * freq[:, None]  # (q, H)
    pe = torch.empty(channels, height, width, device=device, dtype=torch.float32)
    half = channels // 2
    pe[0:half:2] = torch.sin(xs)[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(xs)[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(ys)[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(ys)[:, :, None].expand(-1, -1, width)
    return pe.to(dtype)[None]


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channels of each cell of a (B,C,H,W) map."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_subnet(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """conv3x3 - LayerNorm - ReLU - conv3x3; the last convolution starts at zero (identity coupling)."""
    last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    assert last.bias is not None  # nn.Conv2d has a bias by default
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), LayerNorm2d(hidden), nn.ReLU(inplace=True), last
    )


def _work_dtype(x: Tensor) -> torch.dtype:
    """The flows compute in float32 (float64 when given float64), also under fp16 autocast."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _halves(channels: int) -> tuple[int, int]:
    if channels < 2:
        raise ValueError(f"a coupling block needs at least 2 channels, got {channels}")
    return channels - channels // 2, channels // 2


def _seeded_permutation(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class ConditionalCoupling(InvertibleModule):
    """One parallel-flow block: conditional affine coupling, per-channel affine, channel permutation.

    Forward, for x = (x1, x2) split along the channels and the condition c (positional encoding)::

        s, t = subnet([x1, c]);  s = soft_clamp(s)
        u = (x1, x2 * exp(s) + t)
        y = permute(u * exp(g) + b)

    log|det J| = sum(s) + H * W * sum(g). ``g``, ``b`` are learned per channel; the permutation is a
    fixed random one stored as a buffer.
    """

    def __init__(
        self,
        dims_in: Sequence[tuple[int, ...]],
        dims_c: Sequence[tuple[int, ...]] | None = None,
        *,
        hidden_ratio: float = 1.0,
        clamp: float = DEFAULT_CLAMP,
        perm_seed: int = 0,
    ) -> None:
        super().__init__(dims_in, dims_c)
        channels = int(dims_in[0][0])
        self.cond_channels = int(sum(d[0] for d in dims_c)) if dims_c else 0
        self.split = _halves(channels)
        self.clamp = float(clamp)
        hidden = max(1, round(hidden_ratio * channels))
        self.subnet = conv_subnet(self.split[0] + self.cond_channels, hidden, 2 * self.split[1])
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        perm = _seeded_permutation(channels, perm_seed)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def _coefficients(self, x1: Tensor, c: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        dt = x1.dtype
        if self.cond_channels:
            conds = [ci.expand(x1.shape[0], -1, -1, -1).to(dt) for ci in c]
            x1 = torch.cat([x1, *conds], dim=1)
        s, t = self.subnet(x1).to(dt).chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(
        self, x_or_z: Sequence[Tensor], c: Sequence[Tensor] | None = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[Tensor], Tensor]:
        x = x_or_z[0]
        x = x.to(_work_dtype(x))
        conds = list(c) if c is not None else []
        hw = x.shape[-2] * x.shape[-1]
        log_scale = self.log_scale.to(x.dtype)
        offset = self.offset.to(x.dtype)
        global_ld = log_scale.sum() * hw
        if not rev:
            x1, x2 = x.split(self.split, dim=1)
            s, t = self._coefficients(x1, conds)
            u = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
            y = (u * torch.exp(log_scale) + offset).index_select(1, self.perm)
            return (y,), s.sum(dim=(1, 2, 3)) + global_ld
        u = (x.index_select(1, self.perm_inv) - offset) * torch.exp(-log_scale)
        u1, u2 = u.split(self.split, dim=1)
        s, t = self._coefficients(u1, conds)
        x = torch.cat([u1, (u2 - t) * torch.exp(-s)], dim=1)
        return (x,), -(s.sum(dim=(1, 2, 3)) + global_ld)

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims


class FusionCoupling(InvertibleModule):
    """The fusion block: a two-step affine coupling across all scales at once.

    Each scale i is split into halves (a_i, b_i). Step 1: the a-halves of all scales are average-pooled
    to the smallest map, concatenated and passed through one conv subnet, whose output is split per
    scale and upsampled (bilinear) back to each scale's size, giving (s_i, t_i) with which
    ``b_i <- b_i * exp(soft_clamp(s_i)) + t_i``. Step 2 does the same from the new b-halves to the
    a-halves. Finally each scale's channels go through a fixed permutation (buffer). Sizes are read at
    run time, so the block works for any tile size.
    """

    def __init__(
        self,
        dims_in: Sequence[tuple[int, ...]],
        dims_c: Sequence[tuple[int, ...]] | None = None,
        *,
        hidden_ratio: float = 1.0,
        clamp: float = DEFAULT_CLAMP,
        perm_seed: int = 0,
    ) -> None:
        super().__init__(dims_in, dims_c)
        if dims_c:
            raise ValueError("FusionCoupling takes no condition")
        self.channels = [int(d[0]) for d in dims_in]
        self.splits = [_halves(ch) for ch in self.channels]
        self.clamp = float(clamp)
        in_a = sum(sp[0] for sp in self.splits)
        in_b = sum(sp[1] for sp in self.splits)
        self.subnet_ab = conv_subnet(in_a, max(1, round(hidden_ratio * in_a)), 2 * in_b)  # a -> coefficients of b
        self.subnet_ba = conv_subnet(in_b, max(1, round(hidden_ratio * in_b)), 2 * in_a)  # b -> coefficients of a
        for i, ch in enumerate(self.channels):
            perm = _seeded_permutation(ch, perm_seed + i)
            self.register_buffer(f"perm{i}", perm)
            self.register_buffer(f"perm_inv{i}", torch.argsort(perm))

    def _coefficients(
        self, subnet: nn.Module, parts: Sequence[Tensor], out_channels: Sequence[int]
    ) -> list[tuple[Tensor, Tensor]]:
        h = min(p.shape[-2] for p in parts)
        w = min(p.shape[-1] for p in parts)
        pooled = [p if p.shape[-2:] == (h, w) else F.adaptive_avg_pool2d(p, (h, w)) for p in parts]
        out = subnet(torch.cat(pooled, dim=1)).to(parts[0].dtype)
        coeffs = []
        for chunk, p in zip(out.split([2 * ch for ch in out_channels], dim=1), parts, strict=True):
            if chunk.shape[-2:] != p.shape[-2:]:
                chunk = F.interpolate(chunk, size=p.shape[-2:], mode="bilinear", align_corners=False)
            s, t = chunk.chunk(2, dim=1)
            coeffs.append((soft_clamp(s, self.clamp), t))
        return coeffs

    def forward(
        self, x_or_z: Sequence[Tensor], c: Sequence[Tensor] | None = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        n_a = [sp[0] for sp in self.splits]
        n_b = [sp[1] for sp in self.splits]
        dt = _work_dtype(x_or_z[0])
        logdet = torch.zeros(x_or_z[0].shape[0], device=x_or_z[0].device, dtype=dt)
        if not rev:
            halves = [x.to(dt).split(sp, dim=1) for x, sp in zip(x_or_z, self.splits, strict=True)]
            a = [h[0] for h in halves]
            b = [h[1] for h in halves]
            coeffs = self._coefficients(self.subnet_ab, a, n_b)
            b = [bi * torch.exp(s) + t for bi, (s, t) in zip(b, coeffs, strict=True)]
            logdet = logdet + sum(s.sum(dim=(1, 2, 3)) for s, _ in coeffs)
            coeffs = self._coefficients(self.subnet_ba, b, n_a)
            a = [ai * torch.exp(s) + t for ai, (s, t) in zip(a, coeffs, strict=True)]
            logdet = logdet + sum(s.sum(dim=(1, 2, 3)) for s, _ in coeffs)
            out = tuple(
                torch.cat([ai, bi], dim=1).index_select(1, getattr(self, f"perm{i}"))
                for i, (ai, bi) in enumerate(zip(a, b, strict=True))
            )
            return out, logdet
        halves = [
            z.to(dt).index_select(1, getattr(self, f"perm_inv{i}")).split(sp, dim=1)
            for i, (z, sp) in enumerate(zip(x_or_z, self.splits, strict=True))
        ]
        a = [h[0] for h in halves]
        b = [h[1] for h in halves]
        coeffs = self._coefficients(self.subnet_ba, b, n_a)
        a = [(ai - t) * torch.exp(-s) for ai, (s, t) in zip(a, coeffs, strict=True)]
        logdet = logdet - sum(s.sum(dim=(1, 2, 3)) for s, _ in coeffs)
        coeffs = self._coefficients(self.subnet_ab, a, n_b)
        b = [(bi - t) * torch.exp(-s) for bi, (s, t) in zip(b, coeffs, strict=True)]
        logdet = logdet - sum(s.sum(dim=(1, 2, 3)) for s, _ in coeffs)
        return tuple(torch.cat([ai, bi], dim=1) for ai, bi in zip(a, b, strict=True)), logdet

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims


class MultiScaleFlow(nn.Module):
    """Parallel flows (one ``SequenceINN`` per scale) followed by the fusion flow (a ``GraphINN``).

    ``channels``/``sizes``: per scale, the feature channels and a nominal (H, W) (FrEIA needs shapes
    to build the graph; the blocks read the real sizes at run time, so any tile size works).
    ``forward(feats)`` returns (list of z per scale, total log|det J| per sample (B,));
    ``reverse(zs)`` inverts it.
    """

    def __init__(
        self,
        channels: Sequence[int],
        sizes: Sequence[tuple[int, int]],
        flow_blocks: Sequence[int] = DEFAULT_FLOW_BLOCKS,
        fusion_blocks: int = 1,
        clamp: float = DEFAULT_CLAMP,
        pe_channels: int = DEFAULT_PE_CHANNELS,
        hidden_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if not (len(channels) == len(sizes) == len(flow_blocks)):
            raise ValueError("channels, sizes and flow_blocks need one entry per scale")
        if any(int(n) < 0 for n in flow_blocks) or fusion_blocks < 0:
            raise ValueError("block counts must not be negative")
        if pe_channels % 4:
            raise ValueError(f"pe_channels must be a multiple of 4, got {pe_channels}")
        self.channels = [int(c) for c in channels]
        self.pe_channels = int(pe_channels)
        self.parallel = nn.ModuleList()
        for i, (ch, (h, w), n) in enumerate(zip(self.channels, sizes, flow_blocks, strict=True)):
            inn = SequenceINN(ch, h, w)
            for k in range(int(n)):
                inn.append(
                    ConditionalCoupling,
                    cond=0,
                    cond_shape=(self.pe_channels, h, w),
                    hidden_ratio=hidden_ratio,
                    clamp=clamp,
                    perm_seed=1000 * i + k,
                )
            self.parallel.append(inn)
        shapes = [(ch, h, w) for ch, (h, w) in zip(self.channels, sizes, strict=True)]
        inputs = [InputNode(*shape, name=f"scale{i}") for i, shape in enumerate(shapes)]
        nodes: list[Node] = list(inputs)
        prev: list[tuple[Node, int]] = [(n, 0) for n in inputs]
        for k in range(int(fusion_blocks)):
            node = Node(
                prev,
                FusionCoupling,
                {"hidden_ratio": hidden_ratio, "clamp": clamp, "perm_seed": 10_000 + 100 * k},
                name=f"fusion{k}",
            )
            nodes.append(node)
            prev = [(node, i) for i in range(len(self.channels))]
        nodes += [OutputNode(p, name=f"z{i}") for i, p in enumerate(prev)]
        self.fusion = GraphINN(nodes, force_tuple_output=True)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        zs: list[Tensor] = []
        dt = _work_dtype(feats[0])
        logdet = torch.zeros(feats[0].shape[0], device=feats[0].device, dtype=dt)
        inn: SequenceINN  # the ModuleList's entries (typed Module) are the per-scale SequenceINNs
        for f, inn in zip(feats, self.parallel, strict=True):
            f = f.to(dt)
            if len(inn):
                pe = positional_encoding_2d(self.pe_channels, f.shape[-2], f.shape[-1], f.device, dt)
                z, ld = inn(f, c=[pe])
                logdet = logdet + ld
            else:
                z = f
            zs.append(z)
        out, ld = self.fusion(zs)
        return list(out), logdet + ld

    def reverse(self, zs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Inverse of `forward`: (features per scale, log|det| of the inverse = -forward's)."""
        feats, logdet = self.fusion(list(zs), rev=True)
        out: list[Tensor] = []
        inn: SequenceINN  # the ModuleList's entries (typed Module) are the per-scale SequenceINNs
        for z, inn in zip(feats, self.parallel, strict=True):
            if len(inn):
                pe = positional_encoding_2d(self.pe_channels, z.shape[-2], z.shape[-1], z.device, z.dtype)
                x, ld = inn(z, c=[pe], rev=True)
                logdet = logdet + ld
            else:
                x = z
            out.append(x)
        return out, logdet


def nll_loss(zs: Sequence[Tensor], logdet: Tensor) -> Tensor:
    """Mean over the batch of ``(0.5 * ||z||^2 - log|det J|) / D`` (D = dimensions of all scales)."""
    dims = sum(z[0].numel() for z in zs)
    sq = sum(0.5 * z.float().pow(2).flatten(1).sum(dim=1) for z in zs)
    return ((sq - logdet.float()) / dims).mean()


def scale_nll_maps(zs: Iterable[Tensor]) -> list[Tensor]:
    """Per-scale negative log-likelihood per cell, ``0.5 * mean_c z^2`` (B,1,h,w) (constants dropped)."""
    return [0.5 * z.float().pow(2).mean(dim=1, keepdim=True) for z in zs]


def topk_mean(maps: Tensor, fraction: float) -> Tensor:
    """Mean of the largest ``fraction`` of each map's pixels (at least one): (B,...) -> (B,)."""
    flat = maps.flatten(1)
    k = min(flat.shape[1], max(1, int(round(fraction * flat.shape[1]))))
    return flat.topk(k, dim=1).values.mean(dim=1)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class MSFlow(AnomalyModel):
    """Extractor (frozen), parallel and fusion flows, with normalisation statistics and thresholds.

    Buffers (all in the state dict, together with the extractor's weights, so a checkpoint is
    self-contained): ``feat_mean{i}``/``feat_std{i}`` (1,C_i,1,1) per-channel feature standardisation
    (training tiles); ``map_loc``/``map_spread`` (3,) per-scale median and (0.99 quantile - median) of
    the negative log-likelihood maps on normal validation tiles (0 and 1 until calibrated);
    ``image_threshold``/``pixel_threshold`` (NaN until calibrated); ``input_mean``/``input_std``.

    ``forward(x)``: ``x`` is uint8 (B,1|3,H,W) or float already ImageNet-normalised (B,3,H,W), with
    H = W = ``tile_size``; returns (anomaly map (B,1,H,W), image score (B,)); see the module docstring.
    """

    map_loc: Tensor
    map_spread: Tensor

    def __init__(
        self,
        backbone: str = LITE0,
        tile_size: int = 128,
        flow_blocks: Sequence[int] = DEFAULT_FLOW_BLOCKS,
        fusion_blocks: int = 1,
        clamp: float = DEFAULT_CLAMP,
        pe_channels: int = DEFAULT_PE_CHANNELS,
        hidden_ratio: float = 1.0,
        topk: float = DEFAULT_TOPK,
        *,
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        _weights_from_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in MSFLOW_BACKBONES:
            raise ValueError(f"unknown MSFlow backbone {backbone!r}; choose one of {list(MSFLOW_BACKBONES)}")
        self.backbone_name = backbone
        if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < MIN_TILE_SIZE:
            raise ValueError(f"tile_size must be an int >= {MIN_TILE_SIZE}, got {tile_size!r}")
        if len(flow_blocks) != 3:
            raise ValueError(f"flow_blocks needs three entries (one per scale), got {flow_blocks!r}")
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk must be a fraction in (0, 1], got {topk}")
        self.tile_size = tile_size
        self.flow_blocks = tuple(int(n) for n in flow_blocks)
        self.fusion_blocks = int(fusion_blocks)
        self.clamp = float(clamp)
        self.pe_channels = int(pe_channels)
        self.hidden_ratio = float(hidden_ratio)
        self.topk = float(topk)
        self.extractor = MultiScaleExtractor(
            backbone,
            weights_path=weights_path,
            pretrained=pretrained and not _weights_from_checkpoint,
            warn_random=not _weights_from_checkpoint,
        )
        channels = self.extractor.channels
        sizes = [(max(1, math.ceil(tile_size / s)),) * 2 for s in self.extractor.strides]
        self.flows = MultiScaleFlow(
            channels, sizes, self.flow_blocks, self.fusion_blocks, self.clamp, self.pe_channels, self.hidden_ratio
        )
        for i, ch in enumerate(channels):
            self.register_buffer(f"feat_mean{i}", torch.zeros(1, ch, 1, 1))
            self.register_buffer(f"feat_std{i}", torch.ones(1, ch, 1, 1))
        self.register_buffer("map_loc", torch.zeros(len(channels)))
        self.register_buffer("map_spread", torch.ones(len(channels)))
        self._register_common_buffers()
        # Non-tensor facts about how the model was made (backbone weights, training run); saved in the
        # checkpoint's provenance by `save_model`.
        self.provenance: dict[str, Any] = {}
        if not _weights_from_checkpoint:
            self.provenance["backbone"] = self.backbone_provenance(backbone, pretrained, weights_path)

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return KIND_PREFIX + self.backbone_name

    @property
    def num_scales(self) -> int:
        return len(self.extractor.channels)

    def hparams(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "tile_size": self.tile_size,
            "flow_blocks": list(self.flow_blocks),
            "fusion_blocks": self.fusion_blocks,
            "clamp": self.clamp,
            "pe_channels": self.pe_channels,
            "hidden_ratio": self.hidden_ratio,
            "topk": self.topk,
        }

    def set_feature_stats(self, means: Sequence[Tensor], stds: Sequence[Tensor]) -> None:
        for i, (m, s) in enumerate(zip(means, stds, strict=True)):
            getattr(self, f"feat_mean{i}").copy_(m.reshape(1, -1, 1, 1))
            getattr(self, f"feat_std{i}").copy_(s.reshape(1, -1, 1, 1).clamp_min(1e-6))

    def set_map_stats(self, loc: Sequence[float], spread: Sequence[float]) -> None:
        self.map_loc.copy_(torch.tensor([float(v) for v in loc]))
        self.map_spread.copy_(torch.tensor([max(float(v), 1e-6) for v in spread]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.flows.parameters() if p.requires_grad]

    # -- computation -------------------------------------------------------------------------------

    def extract(self, x: Tensor) -> list[Tensor]:
        """Raw (un-standardised) pooled features of a normalised input, under no_grad."""
        return self.extractor(x)

    def standardize(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [
            (f.float() - getattr(self, f"feat_mean{i}")) / getattr(self, f"feat_std{i}") for i, f in enumerate(feats)
        ]

    def flow(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Standardised features -> (z per scale, log|det J| per sample)."""
        return self.flows(feats)

    def maps_from_z(self, zs: Sequence[Tensor], out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(localisation map (B,1,H,W), image score (B,)) from the flow outputs (module docstring)."""
        norm = []
        for i, a in enumerate(scale_nll_maps(zs)):
            a = F.interpolate(a, size=out_hw, mode="bilinear", align_corners=False)
            norm.append((a - self.map_loc[i]) / self.map_spread[i])
        stacked = torch.cat(norm, dim=1)  # (B, S, H, W): normalised negative log-likelihoods
        # additive: -log(mean_s p_s) with p_s = exp(-a_s'), a soft minimum over the scales
        amap = math.log(stacked.shape[1]) - torch.logsumexp(-stacked, dim=1, keepdim=True)
        # multiplicative: -log(prod_s p_s) = sum_s a_s', then the mean of its top-k pixels
        score = topk_mean(stacked.sum(dim=1), self.topk)
        return amap, score

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        if h != self.tile_size or w != self.tile_size:
            raise ValueError(f"expected {self.tile_size}x{self.tile_size} tiles, got {h}x{w}")
        feats = self.standardize(self.extract(self.normalize_input(x)))
        zs, _ = self.flow(feats)
        return self.maps_from_z(zs, (h, w))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


# A checkpoint trained on a backbone with random weights (``pretrained=False``) says so.
RANDOM_BACKBONE_WARNING = UntrainedWarning("backbone", "random_weights", "random_backbone_checkpoint", msg=(
    "this MSFlow model was trained on a RANDOM (untrained) backbone; its detections are not trustworthy"))


def build_msflow_from_checkpoint(ckpt: Checkpoint) -> MSFlow:
    """Builder registered for the kinds ``msflow-<backbone>``: no weight file is read (all in the state)."""
    hp = ckpt.hparams
    backbone = str(hp["backbone"])
    if ckpt.kind != KIND_PREFIX + backbone:
        raise ValueError(f"checkpoint kind {ckpt.kind!r} does not match its backbone {backbone!r}")
    model = MSFlow(
        backbone=backbone,
        tile_size=int(hp["tile_size"]),
        flow_blocks=tuple(int(n) for n in hp.get("flow_blocks", DEFAULT_FLOW_BLOCKS)),
        fusion_blocks=int(hp.get("fusion_blocks", 1)),
        clamp=float(hp.get("clamp", DEFAULT_CLAMP)),
        pe_channels=int(hp.get("pe_channels", DEFAULT_PE_CHANNELS)),
        hidden_ratio=float(hp.get("hidden_ratio", 1.0)),
        topk=float(hp.get("topk", DEFAULT_TOPK)),
        _weights_from_checkpoint=True,
    )
    return restore_model(model, ckpt, RANDOM_BACKBONE_WARNING)
