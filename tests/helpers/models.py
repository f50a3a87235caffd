"""Real model checkpoints for tests that need one but not a trained model (transport, CLI, stages)."""

from __future__ import annotations

from pathlib import Path


def untrained_checkpoint(path: Path, tile: int = 48, *, image_threshold: float = 1e9,
                         pixel_threshold: float = 1e9) -> Path:
    """A complete EfficientAD-S checkpoint with untrained (seeded) weights. The default thresholds are
    reached by no frame: every frame is inspected, none is a defect."""
    import torch

    from knitwatch.models.base import save_model
    from knitwatch.models.efficientad.model import EfficientAD
    from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams

    torch.manual_seed(0)
    model = EfficientAD(size="s", tile_size=tile)
    model.image_threshold.fill_(image_threshold)
    model.pixel_threshold.fill_(pixel_threshold)
    pre = PreprocessConfig(PreprocessParams(tile=tile, stride=tile)).to_dict()
    return save_model(path, model, preprocess=pre, provenance={"id": "untrained"})
