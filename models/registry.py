"""The model kinds knitwatch knows, in one table, and `build_model`: checkpoint -> ready model.

Every kind names the module and function that build it from a checkpoint; the module is imported on
first use only (so listing the kinds, e.g. for the CLI's choices, imports no model code). The CLI
(`knitwatch train --model`), the benchmarks and `build_model` all take the kinds from here. Other
kinds can be added at run time with `register_model_kind`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from knitwatch.models.checkpoint import Checkpoint

# The backbones MSFlow is offered with; each is a kind ``msflow-<backbone>``.
MSFLOW_BACKBONES: tuple[str, ...] = ("efficientnet-lite0", "resnet18", "resnet34", "wide_resnet50_2")


@dataclass(frozen=True)
class ModelKind:
    """A built-in kind: ``builder`` in ``module`` turns its checkpoints into models; ``trainable``: the
    ``knitwatch train`` command trains it (PatchCore is fitted by the accuracy benchmark only)."""

    name: str
    module: str
    builder: str
    trainable: bool = True


_EFFICIENTAD = ("knitwatch.models.efficientad.model", "build_efficientad_from_checkpoint")
_MSFLOW = ("knitwatch.models.msflow.model", "build_msflow_from_checkpoint")
_PATCHCORE = ("knitwatch.models.patchcore.model", "build_patchcore_from_checkpoint")

MODEL_KINDS: tuple[ModelKind, ...] = (
    ModelKind("efficientad-s", *_EFFICIENTAD),
    ModelKind("efficientad-m", *_EFFICIENTAD),
    *(ModelKind(f"msflow-{b}", *_MSFLOW) for b in MSFLOW_BACKBONES),
    ModelKind("patchcore", *_PATCHCORE, trainable=False),
)
_BUILTIN_KINDS: dict[str, ModelKind] = {k.name: k for k in MODEL_KINDS}

Builder = Callable[["Checkpoint"], "nn.Module"]
_BUILDERS: dict[str, Builder] = {}


def builtin_kinds() -> list[str]:
    """The built-in kinds, in the table's order (EfficientAD, MSFlow, PatchCore)."""
    return [k.name for k in MODEL_KINDS]


def trainable_kinds() -> list[str]:
    """The kinds ``knitwatch train`` trains, in the table's order."""
    return [k.name for k in MODEL_KINDS if k.trainable]


def register_model_kind(kind: str, builder: Builder) -> None:
    """Register ``builder(checkpoint) -> nn.Module`` for checkpoints of ``kind`` (e.g. 'msflow')."""
    _BUILDERS[kind] = builder


def known_kinds() -> list[str]:
    """Every kind `build_model` can build (built-in and registered), sorted."""
    return sorted(set(_BUILDERS) | set(_BUILTIN_KINDS))


def build_model(ckpt: Checkpoint | str | Path, device: str | torch.device | None = None) -> nn.Module:
    """The ready (eval-mode) model of a checkpoint (or checkpoint path), whatever its kind."""
    import torch

    from knitwatch.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    builder = _BUILDERS.get(ckpt.kind)
    if builder is None and ckpt.kind in _BUILTIN_KINDS:
        kind = _BUILTIN_KINDS[ckpt.kind]
        builder = getattr(importlib.import_module(kind.module), kind.builder)
        _BUILDERS[ckpt.kind] = builder
    if builder is None:
        raise CheckpointError(f"unknown model kind {ckpt.kind!r}; known kinds: {known_kinds()}")
    try:
        model = builder(ckpt)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot build a {ckpt.kind!r} model from the checkpoint: {exc}") from exc
    model.eval()
    if device is not None:
        model.to(torch.device(device))
    return model
